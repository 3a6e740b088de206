"""FeatureVisualization speed, CPU, ViT-Ti/16 at 112 px, target
``blocks.3.mlp.fc1``, random weights.

(a) speed-up of ``attribute(target=list(range(16)), preset="ghiasi2023")`` over a reference
    loop written like the paper's code: one unit at a time, 8 augmented copies, the full
    network forward every step (hook on the layer), parameter gradients on; same
    augmentations, TV, Adam (0.5, 0.99), cosine schedule, steps and image size. Per-step
    costs do not change over a run, so both are timed for ``--time-steps`` steps and the
    reference on ``--ref-units`` of the units (its units run one after another, so its
    time is linear in their number); both are scaled to ``--steps`` steps and 16 units,
    and the output says so.
(b) overhead of our step over a bare truncated forward+backward of the same batch
    (16 x 8 images; LayerTap stopping at the layer, gradient to the pixels only).
(c) time-to-quality: the mean target activation (patch mean of each image's own unit on the
    returned, un-augmented images) that ``"ghiasi2023"`` reaches after ``--steps`` steps,
    and the wall time ``preset="fast"`` needs to reach it: ``fast`` is run with
    increasing ``steps`` (each a complete run with its own schedule) until its final
    activation is at least the paper preset's; the ratio of the two wall times is reported.

Timings are medians over interleaved repetitions; the machine may be shared, so expect
noise.

    python benchmarks/feature_viz_speed.py              # real run (400 steps; long on 2 cores)
    python benchmarks/feature_viz_speed.py --quick      # 40 steps, fewer repetitions
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import captum_vit as cv
from captum_vit.capture import LayerTap
from captum_vit.optim.objectives import total_variation
from captum_vit.optim.transforms import ColorShift, FadingNoise, RandomDraws, RollJitter

LAYER = "blocks.3.mlp.fc1"


def build_model(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size).eval()


def reference_unit(
    model: torch.nn.Module, unit: int, size: int, steps: int, seed: int, fv_mean, fv_std
) -> torch.Tensor:
    """The paper's loop for one unit: full forward every step, parameter gradients on."""
    layer = dict(model.named_modules())[LAYER]
    for param in model.parameters():
        param.requires_grad_(True)
    draws = RandomDraws(seed, 1, 1, 8)
    transforms = [ColorShift(), FadingNoise(0.5), RollJitter()]
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    image.requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=0.1, betas=(0.5, 0.99))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0)
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, o: captured.__setitem__("out", o))
    try:
        for step in range(steps):
            x = image.repeat(8, 1, 1, 1)
            for transform in transforms:
                x = transform(x, draws, step, steps)
            model((x - fv_mean) / fv_std)  # the whole network, head included
            feats = captured["out"][:, 1:, unit].mean(dim=1)  # exclude cls, mean over patches
            loss = -feats.mean() / 8 + 5e-5 * total_variation(x).mean()
            optimizer.zero_grad()
            model.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                image.clamp_(0, 1)
    finally:
        handle.remove()
        for param in model.parameters():
            param.requires_grad_(False)
    return image.detach()


def bare_step(model: torch.nn.Module, batch: torch.Tensor, units: torch.Tensor, tap) -> None:
    x = batch.clone().requires_grad_(True)
    out = tap.run(x)[0]
    rows = units.repeat_interleave(batch.shape[0] // len(units))
    loss = out[torch.arange(len(rows)), 1:, rows].mean()
    loss.backward()


def mean_unit_activation(fv, images: torch.Tensor, units: list[int]) -> float:
    out = fv.forward_to_layer(images)
    patches = out[:, 1:, :].mean(dim=1)  # patch mean, cls excluded
    return float(patches[torch.arange(len(units)), torch.tensor(units)].mean())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400, help="steps of the paper preset")
    parser.add_argument("--time-steps", type=int, default=10, help="steps timed in (a), (b)")
    parser.add_argument("--ref-units", type=int, default=2, help="reference units timed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fast-steps", default="4,8,16,24,32,48,64")
    parser.add_argument(
        "--quality-units", type=int, default=None, help="units in (c) (default: --units)"
    )
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 repetition")
    parser.add_argument("--skip-reference", action="store_true", help="no (a)")
    parser.add_argument("--skip-quality", action="store_true", help="no (c)")
    parser.add_argument(
        "--paper-result",
        default=None,
        help="SECONDS,ACTIVATION of an earlier paper-preset run in (c), instead of rerunning it",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.time_steps, args.reps, args.ref_units = 40, 4, 1, 1
    torch.set_num_threads(args.threads)
    model = build_model(args.size)
    for param in model.parameters():  # the bare step computes no weight gradients either
        param.requires_grad_(False)
    fv = cv.FeatureVisualization(model, LAYER)
    mean, std = fv.wrapped.mean, fv.wrapped.std
    units = list(range(args.units))
    k = args.time_steps
    print(
        f"vit_tiny_patch16_224 (random weights) at {args.size} px, {LAYER}, {args.units} "
        f"units, {args.threads} threads, CPU"
    )

    # warm-up (layout resolution, allocator)
    fv.attribute(target=units, preset="ghiasi2023", steps=1)

    # (a) and (b): interleaved repetitions of k steps each; on a shared machine the load
    # drifts, so each repetition gives its own ratios and their medians are reported
    batch = torch.rand(args.units * 8, 3, args.size, args.size)
    unit_tensor = torch.tensor(units)
    normalized = (batch - mean) / std
    ours, ref, bare = [], [], []
    speedups, overheads = [], []
    for rep in range(args.reps):
        with LayerTap(model, LAYER) as tap, torch.enable_grad():
            t_bare, _ = timed(
                lambda tap=tap: [bare_step(model, normalized, unit_tensor, tap) for _ in range(k)]
            )
        t_ours, _ = timed(lambda: fv.attribute(target=units, preset="ghiasi2023", steps=k))
        if not args.skip_reference:
            t_ref, _ = timed(
                lambda: [
                    reference_unit(model, u, args.size, k, 0, mean, std)
                    for u in units[: args.ref_units]
                ]
            )
            ref.append(t_ref / k / args.ref_units * args.units)
            speedups.append(ref[-1] / (t_ours / k))
        ours.append(t_ours / k)
        bare.append(t_bare / k)
        overheads.append(ours[-1] / bare[-1] - 1)
        print(
            f"    rep {rep}: ours {ours[-1]:.3f} s/step, bare {bare[-1]:.3f} s/step"
            + (f", reference {ref[-1]:.3f} s/step" if ref else ""),
            flush=True,
        )
    ours_step, bare_step_t = statistics.median(ours), statistics.median(bare)
    if ref:
        ref_step = statistics.median(ref)
        print(
            f"(a) per step, all {args.units} units: ours {ours_step:.3f} s, paper-like "
            f"reference loop {ref_step:.3f} s (timed on {args.ref_units} unit(s) x {k} "
            f"steps, scaled linearly to {args.units} units) -> speed-up "
            f"{statistics.median(speedups):.2f}x (median of per-repetition ratios); for "
            f"{args.steps} steps: ours {ours_step * args.steps:.0f} s, reference "
            f"{ref_step * args.steps:.0f} s"
        )
    print(
        f"(b) bare truncated forward+backward of the same {args.units * 8}-image batch "
        f"{bare_step_t:.3f} s/step; our step {ours_step:.3f} s/step -> overhead "
        f"{100 * statistics.median(overheads):+.1f}% (median of per-repetition ratios)",
        flush=True,
    )
    if args.skip_quality:
        return

    # (c) time-to-quality
    units = list(range(args.quality_units or args.units))
    print(f"(c) on {len(units)} units")
    if args.paper_result:
        paper_time, goal = (float(v) for v in args.paper_result.split(","))
        print(
            f"    ghiasi2023, {args.steps} steps: {paper_time:.1f} s, mean target activation "
            f"{goal:.4f} (given by --paper-result: an earlier run of this script)"
        )
    else:
        paper_time, images = timed(
            lambda: fv.attribute(target=units, preset="ghiasi2023", steps=args.steps)
        )
        goal = mean_unit_activation(fv, images, units)
        print(
            f"    ghiasi2023, {args.steps} steps: {paper_time:.1f} s, mean target activation "
            f"{goal:.4f}",
            flush=True,
        )
    reached = None
    for steps in (int(s) for s in args.fast_steps.split(",")):
        times = []
        for _ in range(args.reps):
            fast_time, images = timed(
                lambda steps=steps: fv.attribute(target=units, preset="fast", steps=steps)
            )
            times.append(fast_time)
        fast_time = statistics.median(times)
        value = mean_unit_activation(fv, images, units)
        print(
            f"    fast, {steps:4d} steps: {fast_time:7.1f} s (median of {len(times)}), "
            f"mean target activation {value:.4f}",
            flush=True,
        )
        if value >= goal:
            reached = fast_time
            break
    if reached is None:
        print("    fast did not reach the paper preset's activation in the steps tried")
    else:
        print(
            f"    time-to-quality: fast reaches it in {reached:.1f} s vs {paper_time:.1f} s "
            f"-> {paper_time / reached:.1f}x faster"
        )
    clean = mean_unit_activation(fv, torch.rand(len(units), 3, args.size, args.size), units)
    print(f"    (random uniform images: mean target activation {clean:.4f})")


if __name__ == "__main__":
    main()
