"""Full-grid SpatialLocalityProbe vs the naive one-backward-per-position loop (issue 4).

ViT-Ti/16 at 224 (random weights), one image, all 12 blocks, all 196 positions. The probe
(batched: one forward stopped after the deepest block for a chunk of image copies, one
backward per layer) is timed end to end, layout resolution included. The naive loop does,
for every (layer, position): one forward of the single image stopped at the layer (early
exit, which is generous to it), one backward of the projected token, |grad| summed per
patch. The naive loop is slow, so it is timed on ``--naive-positions`` positions of every
layer and extrapolated linearly to 196 positions (its cost per position does not depend on
the position); the script says so in its output. The naive fields of those positions are
checked against the probe's (same projections, same images).

    python benchmarks/locality_speed.py [--threads 2] [--naive-positions 4] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import resource
import time

import timm
import torch

from captum_vit import SpatialLocalityProbe, capture_layers
from captum_vit.layout import resolve_layout
from captum_vit.locality import _region_shares


def naive_fields(model, probe, image, report, positions_per_layer):
    """One forward + one backward per (layer, position); returns per-layer shares of the
    probed positions and the elapsed seconds."""
    elapsed, rows = 0.0, []
    normalize = probe.normalize
    for index, (name, site) in enumerate(zip(report.layers, report.sites, strict=True)):
        layout = resolve_layout(
            model, name, normalize(image), attribute_to_layer_input=site == "input"
        )
        r = report.projections[index]
        cells = positions_per_layer[index]
        shares = []
        start = time.perf_counter()
        for cell in cells.tolist():
            x = image.clone().requires_grad_(True)
            out = capture_layers(
                model, name, normalize(x), grad=True, attribute_to_layer_input=site == "input"
            )
            score = layout.tokens(out)[0, cell] @ r
            (grad,) = torch.autograd.grad(score, x)
            shares.append(_region_shares(grad, layout.grid)[0])
        elapsed += time.perf_counter() - start
        rows.append(torch.stack(shares))
    return rows, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-positions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    probe = SpatialLocalityProbe(model, batch_size=args.batch_size)
    start = time.perf_counter()
    report = probe.attribute(image)
    probe_time = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    generator = torch.Generator().manual_seed(1)
    cells = [
        torch.randperm(196, generator=generator)[: args.naive_positions].sort().values
        for _ in report.layers
    ]
    rows, naive_time = naive_fields(model, probe, image, report, cells)
    naive_full = naive_time * 196 / args.naive_positions
    worst = max(
        float((report.fields[i].reshape(196, 196)[cells[i]] - rows[i]).abs().max())
        for i in range(len(report.layers))
    )

    print(
        f"vit_tiny_patch16_224, 224 px, 1 image, {len(report.layers)} layers x 196 positions, "
        f"{args.threads} threads, batch_size {args.batch_size}"
    )
    print(f"  probe (batched, full grid)        {probe_time:8.1f} s   peak RSS {peak:.0f} MiB")
    print(
        f"  naive loop, measured              {naive_time:8.1f} s   "
        f"({args.naive_positions} positions x {len(report.layers)} layers)"
    )
    print(
        f"  naive loop, extrapolated to 196   {naive_full:8.1f} s   "
        f"(linear: x 196/{args.naive_positions})"
    )
    print(f"  speed-up                          {naive_full / probe_time:8.2f} x")
    print(f"  max |naive - probe| field share   {worst:.2e}")
    print(
        "  sites:",
        ", ".join(
            f"{n}:{s}" for n, s in zip(report.layers, report.sites, strict=True) if s != "output"
        )
        or "all outputs",
    )
    print("  locality:", " ".join(f"{v:.3f}" for v in report.locality.tolist()))


if __name__ == "__main__":
    main()
